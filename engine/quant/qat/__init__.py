"""Quantization-aware training (method `qat`): LSQ fake quantizers (fake_quant.py), the
model's own training loss (loss.py), fine-tuning and conversion to packed codes (finetune.py)."""
