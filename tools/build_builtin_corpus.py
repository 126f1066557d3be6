"""Rebuild megatron_attnres/data/builtin_corpus.txt from CPython's bundled documentation text.

The built-in corpus is the plain-text Python language reference that every CPython installation
ships in `pydoc_data/topics.py` (the text behind `help('keywords')`). It is committed to the
repository so that its content does not depend on the interpreter that runs the project; this
script documents where it came from and rebuilds it:

    python tools/build_builtin_corpus.py            # writes the file next to the package
    python tools/build_builtin_corpus.py --check    # exits 1 if the committed file differs

Licence: Python Software Foundation License Version 2 (see megatron_attnres/data/CORPUS.md).
"""

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "megatron_attnres" / "data" / "builtin_corpus.txt"


def build() -> str:
    from pydoc_data.topics import topics

    sections = []
    for name in sorted(topics):
        text = "\n".join(line.rstrip() for line in topics[name].strip().splitlines())
        sections.append(text)
    return "\n\n".join(sections) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = build()
    if args.check:
        same = OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if same else 'differs from this interpreter'}")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode()):,} bytes) from Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
