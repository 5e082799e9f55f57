"""Model code (the Llama family) and weight loading."""
