"""parley-trainer: a LoRA fine-tuning service that speaks OpenAI's fine-tuning API.

It runs where the GPU is. The bot drives it with the same client code it uses for OpenAI
(`FINE_TUNE_BASE_URL`); finished adapters are published to vLLM or Ollama.
"""
