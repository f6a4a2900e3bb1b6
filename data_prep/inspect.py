"""``python -m data_prep.inspect DATA_DIR``: the manifest in brief and a few decoded sequences."""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import DataPrepError
from data_prep.manifest import HUGGINGFACE, load_manifest, open_shard
from data_prep.tokenizer import open_tokenizer


def describe(data_dir: str, samples: int = 3, split: str = "train", width: int = 400) -> str:
    """A human-readable summary of a data directory, with decoded sample sequences."""
    manifest = load_manifest(data_dir)
    raw = manifest.raw
    section = raw["tokenizer"]
    tokenizer_name = (
        f"{section['dir']}/ (Hugging Face {section['class']}: {', '.join(section['files'])})"
        if manifest.tokenizer_kind == HUGGINGFACE
        else section["file"]
    )
    lines = [
        f"{manifest.data_dir}",
        f"  format {raw['format_version']}, seq_len {raw['seq_len']}, vocab {raw['vocab_size']:,} "
        f"({raw['dtype']}), special ids {raw['special_ids']}",
        f"  tokenizer {tokenizer_name} sha256 {section['sha256'][:16]}...",
        f"  made by: {raw.get('command', '?')}",
    ]
    for name, info in raw["splits"].items():
        lines.append(
            f"  {name}: {info['rows']:,} sequences, {info['tokens']:,} tokens, "
            f"{info.get('docs', 0):,} docs, {len(info['shards'])} shard(s)"
        )
    if split not in raw["splits"] or not raw["splits"][split]["rows"]:
        return "\n".join(lines)
    tokenizer = open_tokenizer(manifest.data_dir, section)
    rows = open_shard(manifest.shard_paths(split)[0], manifest.seq_len)
    for i in range(min(samples, len(rows))):
        ids = [int(t) for t in rows[i]]
        pieces = []
        for t in ids:  # show the special tokens, decode the text between them
            if t in manifest.special.all:
                pieces.append(tokenizer.ids_to_tokens([t])[0])
            elif pieces and isinstance(pieces[-1], list):
                pieces[-1].append(t)
            else:
                pieces.append([t])
        text = " ".join(p if isinstance(p, str) else tokenizer.decode(p) for p in pieces)
        if len(text) > width:
            text = text[:width] + " ..."
        lines.append(f"  {split}[{i}]: {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__)
    p.add_argument("data_dir")
    p.add_argument("--samples", type=int, default=3, help="sequences to decode")
    p.add_argument("--split", default="train", choices=("train", "valid"))
    args = p.parse_args(argv)
    try:
        print(describe(args.data_dir, args.samples, args.split))
    except DataPrepError as e:
        print(f"data_prep.inspect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
