"""LoRA fine-tuning of a Hugging Face causal LM as a Consortium workload (`hf-lora`)."""
