"""GGUF, llama.cpp's model format: import (`load.py`, through `reader.py`, `layout.py`, `tokenizer.py`) and
export (`writer.py`). See docs/model.md and docs/export.md."""
