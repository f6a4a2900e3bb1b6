"""``python -m data_prep.inspect DATA_DIR``: the manifest in brief and a few decoded sequences."""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import DataPrepError
from data_prep.manifest import load_manifest, open_shard


def describe(data_dir: str, samples: int = 3, split: str = "train", width: int = 400) -> str:
    """A human-readable summary of a data directory, with decoded sample sequences."""
    import sentencepiece as spm

    manifest = load_manifest(data_dir)
    raw = manifest.raw
    lines = [
        f"{manifest.data_dir}",
        f"  format {raw['format_version']}, seq_len {raw['seq_len']}, vocab {raw['vocab_size']:,} "
        f"({raw['dtype']}), special ids {raw['special_ids']}",
        f"  tokenizer {raw['tokenizer']['file']} sha256 {raw['tokenizer']['sha256'][:16]}...",
        f"  made by: {raw.get('command', '?')}",
    ]
    for name, info in raw["splits"].items():
        lines.append(
            f"  {name}: {info['rows']:,} sequences, {info['tokens']:,} tokens, "
            f"{info.get('docs', 0):,} docs, {len(info['shards'])} shard(s)"
        )
    if split not in raw["splits"] or not raw["splits"][split]["rows"]:
        return "\n".join(lines)
    sp = spm.SentencePieceProcessor(model_file=manifest.tokenizer_path)
    rows = open_shard(manifest.shard_paths(split)[0], manifest.seq_len)
    for i in range(min(samples, len(rows))):
        ids = [int(t) for t in rows[i]]
        pieces = []
        for t in ids:  # show the special tokens, decode the text between them
            if t in manifest.special.all:
                pieces.append(sp.id_to_piece(t))
            elif pieces and isinstance(pieces[-1], list):
                pieces[-1].append(t)
            else:
                pieces.append([t])
        text = " ".join(p if isinstance(p, str) else sp.decode(p) for p in pieces)
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
