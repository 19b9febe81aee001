"""GGUF output (llama.cpp, Ollama): planning (`plan`), the report section (`report`), and the GGUF
published beside a compressed-tensors checkpoint in the same version (`companion`).

Not named `flows/gguf`: Prefect loads a deployment's flow from its file path (`flows/sync.py`) with
`flows/` on sys.path, where a `gguf` package would shadow the `gguf` library.
"""
