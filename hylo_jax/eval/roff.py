"""Plain text from a man page's roff source, for the `man_pages` corpus.

A small converter, not a typesetter: it keeps the words a reader of the page sees and
drops the layout. What it does:

- man(7) macros: ``.TH`` becomes a ``NAME(SECTION)`` title line, ``.SH``/``.SS`` headings
  stand on their own line after a blank one, paragraph macros (``.PP``, ``.TP``, ``.IP``,
  ``.sp`` ...) become blank lines, font macros (``.B``, ``.BR``, ...) keep their
  arguments (the alternating ones without spaces), ``.IP tag`` and ``.OP`` keep the tag.
- mdoc(7) pages: headings and paragraphs as above; on other lines the macro names are
  dropped and their arguments kept (``.Fl x`` gives ``-x``, ``.Xr ls 1`` gives ``ls(1)``).
- Escapes: fonts, sizes, motions and number registers are removed; named characters
  (``\\(em``, ``\\[u00E9]``, ...) and strings (``\\*(lq``, and those the page defines with
  ``.ds``) become their characters; ``\\-``, ``\\e``, ``\\&``, ... their plain form.
- tbl tables keep their cells (cells joined by two spaces).
- Dropped: comments, macro definitions (``.de`` ... ``..``), conditionals (``.if``,
  ``.ie``, ``.el``, with their ``\\{ ... \\}`` blocks), pic and eqn blocks, typesetting
  requests, index entries (``.IX``), and a user-defined macro's line when its arguments
  are only numbers. A page made of a single ``.so`` line (an alias of another page) is
  empty text.

Text lines keep the source's line breaks (man sources are written one sentence or
clause per line); nothing is filled, justified or hyphenated.
"""

from __future__ import annotations

import re

# Named characters (groff_char(7)) that man pages use; others are dropped.
_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "aq": "'", "dq": '"',
    "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9",
    "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7", "di": "\u00f7", "de": "\u00b0", ">=": "\u2265",
    "<=": "\u2264", "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "ti": "~", "ha": "^", "ga": "`",
    "aa": "\u00b4", "sl": "/", "rs": "\\", "ba": "|", "or": "|", "ul": "_", "sc": "\u00a7",
    "ps": "\u00b6", "dg": "\u2020", "ct": "\u00a2", "Fo": "\u00ab", "Fc": "\u00bb", "+-": "\u00b1",
    "12": "\u00bd", "14": "\u00bc", "34": "\u00be", "fm": "\u2032", "sq": "\u25a1", "lh": "\u261c",
    "rh": "\u261e", "at": "@", "sh": "#", "Do": "$", "ss": "\u00df", "'e": "\u00e9", "`e": "\u00e8",
}
# Strings most pages expect the macro package (or their own conditional code) to define.
_DEFAULT_STRINGS = {
    "lq": "\u201c", "rq": "\u201d", "Aq": "'", "R": "\u00ae", "Tm": "\u2122", "C+": "C++",
    'L"': '"', 'R"': '"', "C`": '"', "C'": '"', "PI": "\u03c0",
}
# Single-character escapes with a plain form ("" drops them).
_SIMPLE = {
    "-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "&": "", "|": "", "^": "", ")": "",
    ",": "", "/": "", ":": "", "%": "", "c": "", "d": "", "u": "", "'": "'", "`": "`", ".": ".",
    "t": "\t", "p": "", "r": "", "a": "", "{": "", "}": "", "E": "", "!": "",
}
_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<char2>..)                              # \(xx named character
      | \[(?P<charb>[^\]]*)\]                        # \[name] named character
      | \*(?:\((?P<str2>..)|\[(?P<strb>[^\]\s]*)[^\]]*\]|(?P<str1>.))   # strings
      | [fFsnmMgkY](?:\(..|\[[^\]]*\]|[-+]?\d+|[-+]?\(\d\d|.)           # fonts, sizes, registers
      | [hvwlLoXDbxSzRZNCHoV]'[^']*'                  # motions, widths, drawing, device controls
      | (?P<one>.)
      | $
    )""",
    re.X,
)
# Requests and macros that only lay out the page.
_LAYOUT = set(
    "ad bp br ce cu da di ec eo ev fam fc fi fl ft hc hw hy in it lc lg ll ls lt mc mk na ne nf nh nm nn nr "
    "ns nx pc pl pm pn po ps rd rm rn rr rs rt ss sv sy ta tc ti tl tm tr uf ul vs wh cc c2 em ch ab als "
    "blm cflags chop class color composite cp defcolor do ecs ecr evc fchar fcolor fschar fspecial ftr "
    "fzoom gcolor hcode hla hlm hpf hpfa hpfcode hym hys kern length linetabs lsm mso nop nroff open "
    "opena output pev pi pnr psbb pso ptr pvs rchar return rfschar rj rnn schar shc shift sizes special "
    "spreadwarn stringdown stringup substring troff unformat vpt warn warnscale write writec writem "
    "RS RE PD IX UC DT AT LO Vb Ve Sp INDENT UNINDENT EX EE TQ YS ME UE UR MT PE PS "
    "Dd Os Bl El Bd Ed Bk Ek Bf Ef".split()
)
_PARAGRAPH = {"PP", "LP", "P", "HP", "TP", "sp", "Pp", "Lp", "QS", "QE", "bP"}
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_MDOC_MACROS = set(
    "Ac Ad An Ao Ap Aq Ar At Bc Bo Bq Brc Bro Brq Bsx Bx Cd Cm Dc Dl D1 Do Dq Dv Dx Ec Em En Eo Er Es Ev "
    "Ex Fa Fc Fd Fl Fn Fo Fr Ft Fx Hf Ic In It Lb Li Lk Me Ms Mt Nd Nm No Ns Nx Oc Oo Op Ot Ox Pa Pc Pf "
    "Po Pq Qc Ql Qo Qq Re Rs Rv Sc Sm So Sq St Sx Sy Ta Tn Ux Va Vt Xc Xo Xr".split()
)


def roff_to_text(source: str) -> str:
    """The readable text of a man page given its roff source (see the module docstring)."""
    lines = source.replace("\r\n", "\n").split("\n")
    if sum(1 for x in lines if x.strip()) == 1 and lines[0].startswith(".so "):
        return ""  # an alias: `.so man1/other.1` names the page that holds the text
    strings = dict(_DEFAULT_STRINGS)
    out: list[str] = []
    i, n = 0, len(lines)
    mdoc = any(x.startswith(".Dd") for x in lines[:40])
    while i < n:
        line = lines[i]
        i += 1
        while re.search(r"(?<!\\)(\\\\)*\\$", line) and i < n:  # an escaped newline continues the line
            line, i = line[:-1] + lines[i], i + 1
        if not line.startswith((".", "'")):
            text = _unescape(line, strings)
            if text.strip() or out:
                out.append(text.rstrip())
            continue
        name, args = _request(line)
        if name in ("", "\\\"", "\\#") or name.startswith(('\\"', "\\#")):
            continue
        if name in ("de", "de1", "am", "ig", "dei", "ami"):  # a macro definition or a block comment
            end = ".." if name != "ig" or not args else f".{args[0]}"
            while i < n and lines[i].strip() != end:
                i += 1
            i += 1
        elif name in ("if", "ie", "el", "while"):
            depth = line.count("\\{") - line.count("\\}")
            while depth > 0 and i < n:
                depth += lines[i].count("\\{") - lines[i].count("\\}")
                i += 1
        elif name in ("PS", "EQ"):  # pic pictures, eqn equations
            end = ".PE" if name == "PS" else ".EN"
            while i < n and not lines[i].startswith(end):
                i += 1
            i += 1
        elif name == "TS":
            i = _table(lines, i, strings, out)
        elif name == "ds" and args:
            strings[args[0]] = _unescape(" ".join(args[1:]).lstrip('"'), strings)
        elif name in ("TH", "Dt") and args:
            title = f"{_unescape(args[0], strings)}({args[1] if len(args) > 1 else ''})"
            manual = _unescape(args[4], strings) if name == "TH" and len(args) > 4 else ""
            out.append(f"{title}  {manual}".rstrip())
        elif name in ("SH", "SS", "Sh", "Ss"):
            heading = _unescape(" ".join(args), strings)
            if not heading and i < n and not lines[i].startswith((".", "'")):
                heading, i = _unescape(lines[i], strings), i + 1
            out += ["", heading.strip()]
        elif name in _PARAGRAPH:
            out.append("")
        elif name == "IP":
            out.append("")
            if args and args[0]:
                out.append(_unescape(args[0], strings))
        elif name in ("B", "I", "SM", "SB", "SY"):
            if args:
                out.append(_unescape(" ".join(args), strings))
        elif name in _ALTERNATING:
            out.append(_unescape("".join(args), strings))
        elif name == "OP":
            out.append("[" + _unescape(" ".join(args), strings) + "]")
        elif name in _LAYOUT or name == "so":
            continue
        elif mdoc and (name in _MDOC_MACROS or name == "It"):
            text = _mdoc_line(name, args, strings)
            if name == "It":
                out.append("")
            if text:
                out.append(text)
        elif args and not all(re.fullmatch(r"[-+]?[\d.]+[a-z]?", a) for a in args):
            # A macro the page defined itself (e.g. X11's .ZN name): its arguments are text.
            out.append(_unescape(" ".join(args), strings))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _request(line: str) -> tuple[str, list[str]]:
    """(name, arguments) of a control line; quoted arguments may hold spaces."""
    body = line[1:].lstrip(" \t")
    m = re.match(r'(\\"|\\#|[^\s\\]*)', body)
    name = m.group(1)
    rest = body[m.end():]
    args, cur, quoted, j = [], "", False, 0
    started = False
    while j < len(rest):
        c = rest[j]
        if c == "\\" and rest[j + 1: j + 2] == '"' and not quoted:
            break  # a comment ends the line
        if c == '"':
            if quoted and rest[j + 1: j + 2] == '"':
                cur += '"'
                j += 2
                continue
            quoted, started = not quoted, True
        elif c in " \t" and not quoted:
            if started:
                args.append(cur)
            cur, started = "", False
        else:
            cur += c
            started = True
            if c == "\\" and j + 1 < len(rest):
                cur += rest[j + 1]
                j += 1
        j += 1
    if started:
        args.append(cur)
    return name, args


def _unescape(text: str, strings: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("char2") or m.group("charb")
        if name is not None:
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _CHARS.get(name, "")
        name = m.group("str2") or m.group("strb") or m.group("str1")
        if name is not None:
            return strings.get(name, "")
        one = m.group("one")
        if one is None:
            return ""
        if one == '"' or one == "#":
            return "\0"  # a comment: cut below
        return _SIMPLE.get(one, one)

    return _ESCAPE.sub(sub, text).split("\0", 1)[0]


def _mdoc_line(name: str, args: list[str], strings: dict[str, str]) -> str:
    words, j = [], 0
    tokens = [name] + args
    while j < len(tokens):
        t = tokens[j]
        if t == "Fl":
            flag = tokens[j + 1] if j + 1 < len(tokens) and tokens[j + 1] not in _MDOC_MACROS else ""
            words.append("-" + flag)
            j += 2 if flag else 1
            continue
        if t == "Xr" and j + 2 < len(tokens):
            words.append(f"{tokens[j + 1]}({tokens[j + 2]})")
            j += 3
            continue
        if t == "Nd":
            words.append("-")
        elif t not in _MDOC_MACROS:
            words.append(t)
        j += 1
    return _unescape(" ".join(words), strings)


def _table(lines: list[str], i: int, strings: dict[str, str], out: list[str]) -> int:
    """Skips a tbl table's options and format lines, keeps its cells; returns the line after .TE."""
    n = len(lines)
    tab = "\t"
    if i < n and lines[i].rstrip().endswith(";"):  # the options line, e.g. `allbox tab(:);`
        m = re.search(r"tab\s*\((.)\)", lines[i])
        tab = m.group(1) if m else tab
        i += 1
    while i < n and not lines[i].rstrip().endswith("."):  # format lines; the last one ends with "."
        i += 1
    i += 1
    while i < n and not lines[i].startswith(".TE"):
        row = lines[i]
        i += 1
        if row.startswith(".T&"):
            while i < n and not lines[i].rstrip().endswith("."):
                i += 1
            i += 1
            continue
        if row.startswith((".", "'")) or row.strip() in ("_", "=", "T}"):
            continue
        cells = [c.replace("T{", "").replace("T}", "").strip() for c in row.split(tab)]
        text = _unescape("  ".join(c for c in cells if c), strings)
        if text.strip():
            out.append(text)
    return i + 1
