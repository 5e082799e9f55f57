"""`counterpoint eval`: output quality of decoding configurations on the bundled evaluation sets
(serving/eval/README.md), offline or against any OpenAI-compatible server."""
