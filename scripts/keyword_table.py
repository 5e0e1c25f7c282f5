"""Prints the README's table of generation keywords from the extension's one list of them
(``granite_rs._granite_rs.GENERATION_KEYWORDS``); tests/test_keywords.py checks that the README
holds exactly this table."""

from granite_rs._granite_rs import GENERATION_KEYWORDS


def table() -> str:
    rows = ["| keyword | type | default | accepts | meaning |", "| --- | --- | --- | --- | --- |"]
    for k in GENERATION_KEYWORDS:
        kind = {"strs": "str or list of str", "ints": "list of int", "json": "dict or JSON str"}.get(k["type"], k["type"])
        if k["nullable"]:
            kind += " or None"
        accepts = k["range"].replace("|", "\\|") or "-"
        rows.append(f"| `{k['name']}` | {kind} | `{k['default']!r}` | {accepts} | {k['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
