"""GGUF output (llama.cpp, Ollama): planning (`plan`), the report section (`report`), and the GGUF
published beside a compressed-tensors checkpoint in the same version (`companion`)."""
