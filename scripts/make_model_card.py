"""Write the model cards (README.md) of a trained target/draft pair from the training log JSON.

    python scripts/make_model_card.py --log ollm_triton/assets/train_log_16k.json --folder ollm_triton/assets

The cards are written by the same code as at the end of a training run (scripts/train_tiny_lm.py write_card), so a
model trained on the device whose log came back can get its card here, next to the unpacked checkpoints, without
re-running anything; every number in a card comes from the log. `--note` adds a markdown file under "Notes".
`--only target` writes the target's card alone (a pair whose draft is not shipped, e.g. tiny-llama-16k):

    python scripts/make_model_card.py --log ollm_triton/assets/train_log_16k.json --folder ollm_triton/assets \
        --only target --note /tmp/note_16k.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_lm import write_card  # noqa: E402


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True, help="the JSON log train_tiny_lm.py wrote (--log)")
    p.add_argument("--folder", required=True, help="folder holding the target and draft checkpoint folders")
    p.add_argument("--names", default=None, help="target,draft folder names (default: the log's --names)")
    p.add_argument("--note", default=None, help="a markdown file added to the cards under Notes")
    p.add_argument("--only", choices=("target", "draft"), default=None, help="write this model's card alone")
    args = p.parse_args(argv)
    log = json.loads(Path(args.log).read_text())
    roles = [args.only] if args.only else ["target", "draft"]
    missing = [k for k in (*roles, "eval_env") if k not in log] + [
        f"{k}.eval" for k in roles if k in log and "eval" not in log[k]]
    if missing:
        raise SystemExit(f"{args.log}: no {', '.join(missing)} in the log; a card needs a run that trained and "
                         "evaluated (train_tiny_lm.py without --skip-eval, or --eval-only afterwards)")
    if args.note:
        log["card_note"] = Path(args.note).read_text()
    names = (args.names or log["args"].get("names") or "tiny-llama,tiny-llama-draft").split(",")
    written = []
    for name, role, folder in (("target", "target", names[0]), ("draft", "draft", names[1])):
        if name not in roles:
            continue
        folder = Path(args.folder) / folder
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} holds no checkpoint (config.json); unpack the trained folders first")
        write_card(folder, name, log, role)
        written.append(folder / "README.md")
        print(f"wrote {folder / 'README.md'}")
    return written


if __name__ == "__main__":
    main()
