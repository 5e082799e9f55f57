from counterpoint.serving.cli import main

main()
