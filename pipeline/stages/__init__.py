"""Built-in quantization stages. Each module holds one stage; start reading at fp8.py."""
