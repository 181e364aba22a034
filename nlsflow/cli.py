"""Command-line words from one string: what `make ... ARGS='...'` passes as `--args "$ARGS"`.

A shell splits `extract.subnet={"a": 8, "b": 4}` at its spaces; `split_args` splits only at whitespace outside
quotes and outside {...} / [...], so a YAML value stays one override. Quotes stay as written (YAML reads them), except
around a whole word (`--out "my runs"`), which loses them as in a shell.
"""

from __future__ import annotations

from nlsflow.errors import NlsflowError

CLOSING = {"{": "}", "[": "]"}
QUOTES = "'\""
FIX = "close every quote and bracket, e.g. ARGS='extract.subnet={\"layers.0.qkv\": 8} train.max_steps=30'"


def split_args(text: str) -> list[str]:
    """Split at whitespace outside quotes and brackets; NlsflowError on an unbalanced quote or bracket."""
    words: list[str] = []
    word: list[str] = []
    open_brackets: list[str] = []
    quote = ""
    chars = iter(text)
    for char in chars:
        if quote:
            word.append(char)
            if char == "\\" and quote == '"':  # YAML's escapes in double quotes: \" does not close
                word.append(next(chars, ""))
            elif char == quote:
                quote = ""
        elif char in QUOTES:
            quote = char
            word.append(char)
        elif char in CLOSING:
            open_brackets.append(char)
            word.append(char)
        elif char in CLOSING.values():
            if not open_brackets or CLOSING[open_brackets.pop()] != char:
                raise NlsflowError(f"--args {text!r}: '{char}' closes no open bracket; {FIX}")
            word.append(char)
        elif char.isspace() and not open_brackets:
            if word:
                words.append(_unquote("".join(word)))
                word = []
        else:
            word.append(char)
    if quote:
        raise NlsflowError(f"--args {text!r}: the quote {quote} is never closed; {FIX}")
    if open_brackets:
        raise NlsflowError(f"--args {text!r}: '{open_brackets[-1]}' is never closed; {FIX}")
    if word:
        words.append(_unquote("".join(word)))
    return words


def _unquote(word: str) -> str:
    """A word wholly inside one pair of quotes, as a shell would pass it; any other word as written."""
    if len(word) >= 2 and word[0] in QUOTES and word[-1] == word[0] and word[0] not in word[1:-1]:
        return word[1:-1]
    return word


def expand_args(argv: list[str]) -> list[str]:
    """argv with each `--args TEXT` (or `--args=TEXT`) replaced by the words of TEXT (split_args)."""
    out: list[str] = []
    words = iter(argv)
    for arg in words:
        if arg == "--args":
            text = next(words, None)
            if text is None:
                raise NlsflowError("--args needs a value; pass --args 'key=value ...' (make: ARGS='key=value ...')")
            out += split_args(text)
        elif arg.startswith("--args="):
            out += split_args(arg.removeprefix("--args="))
        else:
            out.append(arg)
    return out
