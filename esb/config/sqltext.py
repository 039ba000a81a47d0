"""The shape of a user's SQL statement, read without a database: what esb must know before
it wraps a notification's query in its own (``SELECT * FROM (<query>) AS esb_q ...``).

Not a parser: string literals, quoted identifiers, dollar-quoted bodies and comments are
blanked out, and what is left is read at parenthesis depth 0, which is enough to find a
trailing semicolon, a second statement, a parenthesis that would close esb's wrapper, and
a LIMIT, OFFSET or FETCH of the statement's own.
"""

from __future__ import annotations

import re

_DOLLAR_TAG = re.compile(r"\$[A-Za-z_]?[A-Za-z0-9_]*\$")
PAGING_WORDS = ("LIMIT", "OFFSET", "FETCH")


def code_only(sql: str) -> str:
    """SQL with every literal, quoted identifier and comment replaced by spaces (same length,
    so positions still match). An unterminated one blanks everything after it."""
    out = list(sql)
    i, n = 0, len(sql)

    def blank(start: int, end: int) -> None:
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
        elif ch == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
        elif ch in "'\"`":
            end = i + 1
            while True:
                end = sql.find(ch, end)
                if end < 0:
                    end = n
                    break
                if sql.startswith(ch * 2, end):  # a doubled quote stays inside
                    end += 2
                    continue
                end += 1
                break
        elif ch == "$" and (tag := _DOLLAR_TAG.match(sql, i)):
            close = sql.find(tag.group(), tag.end())
            end = n if close < 0 else close + len(tag.group())
        else:
            i += 1
            continue
        blank(i, end)
        i = end
    return "".join(out)


def statement_text(sql: str) -> str:
    """SQL without surrounding blanks and without one final ``;`` (with any comment after
    it): the statement as esb puts it inside its own."""
    code = code_only(sql).rstrip()
    if code.endswith(";"):
        return sql[: len(code) - 1].strip()
    return sql.strip()


def wrapping_problem(sql: str) -> str | None:
    """Why SQL cannot be the inner query of esb's keyset query, or None."""
    code = code_only(statement_text(sql))
    depth = 0
    words: list[str] = []
    for match in re.finditer(r"[();]|[A-Za-z_][A-Za-z0-9_]*", code):
        token = match.group()
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth < 0:
                return "has a ')' that closes no '(' of its own"
        elif token == ";":
            return "must be one statement (a ';' ends it before its end)"
        elif depth == 0:
            words.append(token.upper())
    if depth > 0:
        return "has a '(' that is never closed"
    paging = [word for word in PAGING_WORDS if word in words]
    if paging:
        return (f"must not {' or '.join(paging)} its own rows in watermark mode: esb reads them a "
                "batch at a time past the watermark (max_rows, batch_size), so a LIMIT of its own "
                "would cut the rows before that and end the notification's deliveries")
    return None
