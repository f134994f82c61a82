"""What the measuring subcommands (bench, eval) share: list arguments, their reports on disk, and
one-line errors."""
import json
import os
import sys
from typing import Callable, List, Optional

from ..errors import SpeceeError


def name_list(text: str) -> List[str]:
    """"a,b,c" -> ["a", "b", "c"]; "none" or "" -> []."""
    return [] if text.strip() in ("", "none") else [x.strip() for x in text.split(",") if x.strip()]


def write_atomically(path: str, text: str) -> None:
    """A reader never sees a half-written report: write aside, then rename."""
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(prefix: str, report: dict, table: str) -> List[str]:
    """PREFIX.json and PREFIX.md; prints the table. Returns the paths."""
    write_atomically(prefix + ".json", json.dumps(report, indent=1))
    write_atomically(prefix + ".md", table)
    print(table)
    return [prefix + ".json", prefix + ".md"]


def run_command(name: str, parser, command: Callable, argv: Optional[List[str]]) -> int:
    """Parse argv, run command(args) (args.argv keeps the arguments for the report), and turn
    errors and Ctrl-C into one line each."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = list(argv)
    try:
        return command(args)
    except (SpeceeError, ValueError) as e:
        print(f"specee-pc {name}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # llama_decode failing, e.g. out of memory
        print(f"specee-pc {name}: error: llama.cpp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nspecee-pc {name}: interrupted; nothing written", file=sys.stderr)
        return 130
