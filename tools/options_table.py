"""Print the README's options tables from the scripts' own argument parsers, so the two never disagree.

    python tools/options_table.py > /tmp/options.md   # then paste between the README's options markers
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows(parser: argparse.ArgumentParser, skip: set[str]):
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help" and a.dest not in skip]
        if not actions:
            continue
        yield f"\n**{group.title}**\n\n| flag | default | what it does |\n|---|---|---|"
        for action in actions:
            default = "" if action.default in (None, False) else f"`{action.default}`"
            text = (action.help or "").replace("|", "\\|")
            if action.choices:
                text += " Choices: " + ", ".join(f"`{c}`" for c in action.choices) + "."
            yield f"| {', '.join(f'`{o}`' for o in action.option_strings)} | {default} | {text} |"


def main():
    import caption_dopsd
    import dopsd_args
    import evaluate_dopsd
    import train_dopsd_full
    import train_dopsd_lora

    shared = {a.dest for a in dopsd_args.build_parser("")._actions}
    print("### Shared by train_dopsd_lora.py and train_dopsd_full.py")
    print("\n".join(rows(dopsd_args.build_parser(""), set())))
    print("\n### train_dopsd_lora.py only")
    print("\n".join(rows(train_dopsd_lora.make_parser(), shared)))
    print("\n### train_dopsd_full.py only")
    print("\n".join(rows(train_dopsd_full.make_parser(), shared)))
    print("\n### evaluate_dopsd.py")
    print("\n".join(rows(evaluate_dopsd.make_parser(), set())))
    print("\n### caption_dopsd.py")
    print("\n".join(rows(caption_dopsd.make_parser(), set())))


if __name__ == "__main__":
    main()
