"""Data pipeline throughput: read -> normalise -> render -> tokenize the bundled sets.

Run with `just bench`. Prints rows/s and tokens/s per dataset with the built-in tiny tokenizer.
"""

from __future__ import annotations

import time

from finetune.core import prepare
from finetune.core.config import DataConfig, Recipe
from finetune.files import datasets, tokenizer
from finetune.files.tiny import ensure_tiny
from finetune.shell.data.check import template_for


def main() -> None:
    tok = tokenizer.load_tokenizer(ensure_tiny())
    sp, enc = tokenizer.specials(tok), tokenizer.encoder(tok)
    print(f"{'dataset':10} {'rows':>7} {'tokens':>9} {'rows/s':>9} {'tokens/s':>10}")
    for name in datasets.bundled_names():
        recipe = Recipe(data=DataConfig(path=name))
        files = datasets.locate(name).unwrap()
        start = time.perf_counter()
        rows_n = tokens = 0
        for path in files.values():
            rows, _ = datasets.read_rows(path)
            samples, _ = prepare.normalise_rows(rows)
            fmts = {s.format for _, s in samples}
            picked = {f: template_for(recipe, f, tok.chat_template or "").unwrap() for f in fmts}
            encoded, _ = prepare.encode_samples(samples, picked, sp, enc, "assistant", 2048)
            rows_n += len(encoded)
            tokens += sum(len(e.tokens.ids) for e in encoded)
        dt = time.perf_counter() - start
        print(f"{name:10} {rows_n:>7,} {tokens:>9,} {rows_n / dt:>9,.0f} {tokens / dt:>10,.0f}")


if __name__ == "__main__":
    main()
