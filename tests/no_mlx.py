"""Running Python as on a machine without MLX: for subprocess tests of the torch engine and the CLI."""

from __future__ import annotations

# Source for the top of a fresh interpreter: every import finder answers "not found" for mlx and
# mlx_lm, so `import mlx` raises ModuleNotFoundError and `importlib.util.find_spec("mlx")` is None,
# as when MLX is not installed (transformers probes packages that way, and must see it absent).
BLOCK_MLX = (
    "import sys\n"
    "class _Hide:\n"
    "    def __init__(self, inner):\n"
    "        self.inner = inner\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('mlx', 'mlx_lm'):\n"
    "            return None\n"
    "        find = getattr(self.inner, 'find_spec', None)\n"
    "        return find(name, path, target) if find else None\n"
    "    def __getattr__(self, attr):\n"
    "        return getattr(self.inner, attr)\n"
    "sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]\n"
)

# After BLOCK_MLX: torch and peft hidden the same way (neither engine installed).
BLOCK_TORCH = (
    "class _HideTorch(_Hide):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'peft'):\n"
    "            return None\n"
    "        return super().find_spec(name, path, target)\n"
    "sys.meta_path[:] = [_HideTorch(f) for f in sys.meta_path]\n"
)
