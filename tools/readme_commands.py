"""Print the README's two fresh-machine commands, one per line.

They are the first two ```bash blocks under the heading "Fresh machine: the
two commands". `.ci/run` runs what this prints, so the README and CI cannot
drift apart; tests/test_readme.py checks that there are exactly two.
"""
import pathlib
import re
import sys

HEADING = "## Fresh machine: the two commands"


def commands(readme_text):
    """The one-line commands of the bash blocks in the README's fresh-machine section."""
    start = readme_text.index(HEADING)
    nxt = readme_text.find("\n## ", start + len(HEADING))
    section = readme_text[start:nxt if nxt >= 0 else None]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    found = [b.strip() for b in blocks]
    if len(found) != 2 or any("\n" in b for b in found):
        raise ValueError(f"expected two one-line bash blocks under {HEADING!r}, got {found}")
    return found


if __name__ == "__main__":
    path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                        pathlib.Path(__file__).resolve().parent.parent / "README.md")
    print("\n".join(commands(path.read_text())))
