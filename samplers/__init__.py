"""Stride's sampling math: pure PyTorch, never imports ComfyUI."""
