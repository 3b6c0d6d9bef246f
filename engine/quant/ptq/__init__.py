"""Post-training static W8A8 quantization with PyTorch's PT2E flow (method `ptq`): pt2e.py."""
