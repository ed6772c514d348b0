"""GPTQ / AWQ / RTN quantizers for InternViT and the LLM of InternVL-Chat (``python -m quantize``)."""
