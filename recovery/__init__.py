"""Recover-LoRA: synthetic data from the teacher (`data`), LoRA on the quantized student (`student`), KL
distillation (`distill`), evaluation (`evaluation`) and the `recover` / `eval` commands (`cli`)."""
