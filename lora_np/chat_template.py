"""Chat templates: the Jinja subset model chat templates use, rendered as transformers renders them.

    text = render_chat(template, messages, add_generation_prompt=True,
                       special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, enable_thinking=False)

transformers (`utils/chat_template_utils.py`) renders a chat template with jinja2's
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) and the loopcontrols
extension; its context is messages, tools, documents, add_generation_prompt, the special tokens
and the caller's keyword arguments; its globals are raise_exception, strftime_now, namespace and
dict (plus jinja2's range); its tojson filter is json.dumps(x, ensure_ascii=False, ...). This
module does the same without jinja2, for the constructs the chat templates of SmolLM2/3,
Qwen2.5/3, Llama 3.x, Gemma 2/3, Phi-3/4-mini, Mistral, OLMo 2 and Granite use:

- text, `{{ expr }}`, `{% if/elif/else %}`, `{% for a[, b] in expr [if cond] %}` (+ else, loop.*,
  break, continue), `{% set x = ... %}` / `{% set ns.attr = ... %}`, `{# #}`, transformers'
  `{% generation %}`; whitespace control `{%-`, `-%}`, `{%+`, `+%}`, trim_blocks and lstrip_blocks
  exactly as jinja2's lexer applies them (one trailing newline of the template dropped);
- expressions: literals, names, `.attr`, `[key]`, slices, calls, `if`/`else`, `and`/`or`/`not`,
  comparisons (chained), `in`/`not in`, `+ - * / // % **`, `~`, filters and tests (FILTERS, TESTS),
  the str/dict/list methods in METHODS;
- jinja2's scoping: each loop iteration, a loop's `else` and each `{% generation %}` body is a
  new scope (a `set` inside does not outlive it), `if` is not; a name a scope sets before reading
  it is undefined until then, also in the loops nested in it (jinja2 decides this when compiling,
  _scoping), rather than the context's value; a loop's `else` runs unless an
  iteration reached the end of the body (so also after a `break` in the first one); jinja2's
  Undefined (prints as "", is falsy, iterates as empty, and raises on arithmetic, calls,
  attributes and items).

Anything else (macros, call blocks, includes, unknown filters, tests, methods or globals) raises
NotImplementedError naming the construct and its line: never an approximate rendering. Errors
the template raises (raise_exception, an operation on an undefined value) are ChatTemplateError,
a ValueError, with the template's message.
"""
import json
import re
from datetime import datetime
from functools import lru_cache
from numbers import Number
from types import GeneratorType

__all__ = ["ChatTemplateError", "ChatTemplateSyntaxError", "ChatTemplate", "render_chat"]


class ChatTemplateError(ValueError):
    """An error the template raises while rendering (jinja2's TemplateError in transformers)."""


class ChatTemplateSyntaxError(ChatTemplateError):
    """A template that is not valid Jinja (jinja2's TemplateSyntaxError)."""


def _unsupported(what, line):
    return NotImplementedError(f"chat template line {line}: {what} is not supported by lora_np's "
                               "chat template renderer")


# -- values ---------------------------------------------------------------------------------------

class Undefined:
    """jinja2's default Undefined: printable, falsy, iterable; anything else raises."""

    def __init__(self, hint):
        self._hint = hint

    def _fail(self, *args, **kwargs):
        raise ChatTemplateError(self._hint)

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _fail
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _fail
    __pow__ = __rpow__ = __pos__ = __neg__ = __call__ = __getitem__ = _fail
    __lt__ = __le__ = __gt__ = __ge__ = __int__ = __float__ = _fail

    def __eq__(self, other):
        return type(other) is Undefined

    def __ne__(self, other):
        return type(other) is not Undefined

    def __hash__(self):
        return id(Undefined)

    def __str__(self):
        return ""

    def __len__(self):
        return 0

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __repr__(self):
        return "Undefined"


def _type_name(obj):
    return "None" if obj is None else f"{type(obj).__name__} object"


class _Namespace:
    def __init__(self, attrs):
        for name in attrs:
            _Namespace.check_name(name)
        self.attrs = dict(attrs)

    @staticmethod
    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):  # transformers' TemplateNamespace
            raise ChatTemplateError(f"Chat templates cannot store underscore-prefixed attributes on a "
                                    f"namespace, but got {name!r}. Please rename the attribute.")


class _Loop:
    def __init__(self, items, index0):
        self.items, self.index0 = items, index0

    def attribute(self, name, line):
        n, i = len(self.items), self.index0
        if name == "cycle":
            return lambda *args: args[i % len(args)]
        values = {"index0": i, "index": i + 1, "revindex0": n - i - 1, "revindex": n - i, "first": i == 0,
                  "last": i == n - 1, "length": n, "depth": 1, "depth0": 0}
        if name in values:
            return values[name]
        if name in ("previtem", "nextitem"):
            j = i - 1 if name == "previtem" else i + 1
            return self.items[j] if 0 <= j < n else Undefined(f"there is no {name}")
        raise _unsupported(f"loop.{name}", line)


class _Method:
    """A str/dict/list method reached through `.name`; only METHODS may be called."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name


METHODS = {
    str: {"startswith", "endswith", "split", "rsplit", "splitlines", "strip", "lstrip", "rstrip", "replace",
          "lower", "upper", "capitalize", "find", "rfind", "count", "isdigit", "isalpha", "isalnum", "isspace"},
    dict: {"get", "items", "keys", "values"},
    list: {"index", "count"},
    tuple: {"index", "count"},
}


def _getattr(obj, name, line):
    """jinja2's SandboxedEnvironment.getattr: the Python attribute first, then the item."""
    if isinstance(obj, Undefined):
        obj._fail()
    if isinstance(obj, _Namespace):
        return obj.attrs[name] if name in obj.attrs else Undefined(f"'Namespace' has no attribute {name!r}")
    if isinstance(obj, _Loop):
        return obj.attribute(name, line)
    if isinstance(obj, _TemplateDict) and name == "fromkeys":
        return obj.fromkeys
    if isinstance(obj, (str, dict, list, tuple)) and hasattr(obj, name):
        return _Method(obj, name)
    if isinstance(obj, dict) and name in obj:
        return obj[name]
    if hasattr(obj, name):  # e.g. an int's .real: jinja2 would return the Python attribute
        raise _unsupported(f"the attribute {type(obj).__name__}.{name}", line)
    return Undefined(f"{_type_name(obj)!r} has no attribute {name!r}")


def _getitem(obj, key, line):
    """jinja2's SandboxedEnvironment.getitem: the item first, then the attribute of that name."""
    if isinstance(obj, Undefined):
        obj._fail()
    if isinstance(obj, (_Namespace, _Loop, _Method)):
        raise _unsupported(f"subscripting a {type(obj).__name__.strip('_')}", line)
    try:
        return obj[key]
    except (TypeError, LookupError):
        if isinstance(key, str) and isinstance(obj, (str, dict, list, tuple)) and hasattr(obj, key):
            return _Method(obj, key)
    return Undefined(f"{_type_name(obj)!r} has no attribute {key!r}")


def _call(fn, args, kwargs, line):
    if isinstance(fn, _Method):
        allowed = next((names for t, names in METHODS.items() if isinstance(fn.obj, t)), set())
        if fn.name not in allowed:
            raise _unsupported(f"the method {type(fn.obj).__name__}.{fn.name}()", line)
        return getattr(fn.obj, fn.name)(*args, **kwargs)
    if isinstance(fn, Undefined):
        fn._fail()
    if not callable(fn) or isinstance(fn, type):
        raise ChatTemplateError(f"{_type_name(fn)!r} is not callable")
    return fn(*args, **kwargs)


def _to_str(value, line):
    if isinstance(value, (_Namespace, _Loop, _Method, GeneratorType)) \
            or callable(value) and not isinstance(value, Undefined):  # jinja2 prints their repr, an address
        raise _unsupported(f"printing a {type(value).__name__.strip('_')}", line)
    return str(value)


# -- globals, filters, tests ---------------------------------------------------------------------

def _raise_exception(message):
    raise ChatTemplateError(message)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _namespace(*args, **kwargs):
    return _Namespace(dict(*args, **kwargs))


def _range(*args):
    r = range(*args)
    if len(r) > 100000:  # jinja2's sandbox MAX_RANGE
        raise ChatTemplateError("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).")
    return r


class _TemplateDict:  # transformers' TemplateDict: dict(...) and dict.fromkeys(...) only
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    fromkeys = staticmethod(dict.fromkeys)


GLOBALS = {"raise_exception": _raise_exception, "strftime_now": _strftime_now, "namespace": _namespace,
           "range": _range, "dict": _TemplateDict()}
_UNSUPPORTED_GLOBALS = {"cycler", "joiner", "lipsum"}


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _default(value, default_value="", boolean=False):
    return default_value if isinstance(value, Undefined) or boolean and not value else value


def _first(seq):
    for item in seq:
        return item
    return Undefined("No first item, sequence was empty.")


def _last(seq):
    for item in reversed(seq):
        return item
    return Undefined("No last item, sequence was empty.")


def _items(value):  # a generator, as jinja2's: a non-mapping fails when iterated
    if isinstance(value, Undefined):
        return
    if not isinstance(value, dict):
        raise TypeError("Can only get item pairs from a mapping.")
    yield from value.items()


def _replace(s, old, new, count=None):
    return str(s).replace(str(old), str(new), -1 if count is None else count)


def _int(value, default=0, base=10):
    if isinstance(value, Undefined):
        value._fail()
    try:
        return int(value, base) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return default


def _float(value, default=0.0):
    if isinstance(value, Undefined):
        value._fail()
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _attrgetter(attribute, line):
    parts = [int(p) if p.isdigit() else p for p in attribute.split(".")] if isinstance(attribute, str) \
        else [attribute]

    def get(item):
        for part in parts:
            item = _getitem(item, part, line)
        return item
    return get


def _select(seq, args, keep, attribute, line):
    """select / reject / selectattr / rejectattr: a generator, as jinja2's (a falsy seq gives nothing,
    other errors surface when it is iterated)."""
    if not seq:
        return
    if attribute:
        get, args = _attrgetter(args[0], line), args[1:]
    else:
        get = lambda item: item  # noqa: E731
    if args:
        name, args = args[0], args[1:]
        if name not in TESTS:
            raise _unsupported(f"the test {name!r}", line)
        check = lambda value: TESTS[name](value, *args)  # noqa: E731
    else:
        check = bool
    for item in seq:
        if bool(check(get(item))) == keep:
            yield item


def _map(seq, args, kwargs, line):
    """map(attribute=...) or map('filter', ...): a generator, as jinja2's."""
    if not seq:
        return
    if "attribute" in kwargs:
        get = _attrgetter(kwargs.pop("attribute"), line)
        default = kwargs.pop("default", None)
        if args or kwargs:
            raise _unsupported("map(attribute=...) with other arguments", line)
        for value in map(get, seq):
            yield default if default is not None and isinstance(value, Undefined) else value
        return
    name, args = args[0], args[1:]
    if name not in FILTERS:
        raise _unsupported(f"the filter {name!r}", line)
    for item in seq:
        yield _apply_filter(name, item, args, kwargs, line)


FILTERS = {
    "trim": lambda value, chars=None: str(value).strip(chars),
    "length": len, "count": len,
    "string": str,
    "tojson": _tojson,
    "list": list,
    "join": lambda value, d="": str(d).join(map(str, value)),
    "default": _default, "d": _default,
    "first": _first, "last": _last,
    "lower": lambda s: str(s).lower(), "upper": lambda s: str(s).upper(),
    "capitalize": lambda s: str(s).capitalize(),
    "replace": _replace,
    "items": _items,
    "int": _int, "float": _float, "abs": abs,
    "select": None, "reject": None, "selectattr": None, "rejectattr": None, "map": None,  # need the line
}


def _apply_filter(name, value, args, kwargs, line):
    if name in ("select", "reject", "selectattr", "rejectattr"):
        if kwargs:
            raise _unsupported(f"keyword arguments to {name}", line)
        return _select(value, args, name in ("select", "selectattr"), name.endswith("attr"), line)
    if name == "map":
        return _map(value, args, dict(kwargs), line)
    return FILTERS[name](value, *args, **kwargs)


def _test_iterable(value):
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _test_sequence(value):
    try:
        len(value)
        value.__getitem__  # noqa: B018
    except Exception:
        return False
    return True


TESTS = {
    "defined": lambda v: not isinstance(v, Undefined), "undefined": lambda v: isinstance(v, Undefined),
    "none": lambda v: v is None, "boolean": lambda v: v is True or v is False,
    "true": lambda v: v is True, "false": lambda v: v is False,
    "string": lambda v: isinstance(v, str), "mapping": lambda v: isinstance(v, dict),
    "number": lambda v: isinstance(v, Number),
    "integer": lambda v: isinstance(v, int) and v is not True and v is not False,
    "float": lambda v: isinstance(v, float),
    "iterable": _test_iterable, "sequence": _test_sequence,
    "callable": callable,
    "sameas": lambda v, other: v is other,
    "eq": lambda a, b: a == b, "equalto": lambda a, b: a == b, "==": lambda a, b: a == b,
    "ne": lambda a, b: a != b, "!=": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "lessthan": lambda a, b: a < b, "<": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "<=": lambda a, b: a <= b,
    "gt": lambda a, b: a > b, "greaterthan": lambda a, b: a > b, ">": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "odd": lambda v: v % 2 == 1, "even": lambda v: v % 2 == 0,
    "divisibleby": lambda v, n: v % n == 0,
    "lower": lambda v: str(v).islower(), "upper": lambda v: str(v).isupper(),
}


# -- lexer ------------------------------------------------------------------------------------------

_ROOT = re.compile(r"(.*?)(?:(?P<raw_begin>\{%(\-|\+|)\s*raw\s*(?:\-%\}\s*|%\}))|(?P<variable_begin>\{\{(\-|\+|))"
                   r"|(?P<comment_begin>\{#(\-|\+|))|(?P<block_begin>\{%(\-|\+|)))", re.S)
_COMMENT_END = re.compile(r"(.*?)((?:\+#\}|\-#\}\s*|#\}\n?))", re.S)
_BLOCK_END = re.compile(r"\+%\}|\-%\}\s*|%\}\n?")
_VARIABLE_END = re.compile(r"\-\}\}\s*|\}\}")
_WHITESPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<float>(?<!\.)(\d+_)*\d+((\.(\d+_)*\d+)?e[+\-]?(\d+_)*\d+|\.(\d+_)*\d+))
  | (?P<int>(\d+_)*\d+)
  | (?P<name>[a-zA-Z_][a-zA-Z0-9_]*)
  | (?P<string>'([^'\\]*(?:\\.[^'\\]*)*)'|"([^"\\]*(?:\\.[^"\\]*)*)")
  | (?P<op>//|\*\*|==|!=|<=|>=|[+\-*/%~<>=.,:|()\[\]{};])
""", re.S | re.X)
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _tokenize(source):
    """(line, kind, value) tokens as jinja2's lexer makes them; kinds: data, begin_var, end_var,
    begin_block, end_block, name, string, int, float, op."""
    lines = re.split(r"\r\n|\r|\n", source)
    if lines[-1] == "":  # keep_trailing_newline=False
        del lines[-1]
    source = "\n".join(lines)
    pos, line, line_starting, tokens = 0, 1, True, []
    while pos < len(source):
        m = _ROOT.match(source, pos)
        if m is None:
            tokens.append((line, "data", source[pos:]))
            break
        text, kind = m.group(1), m.lastgroup
        sign = next(g for g in m.groups()[2::2] if g is not None)
        if sign == "-":
            text = text.rstrip()
        elif sign != "+" and kind != "variable_begin":  # lstrip_blocks
            l_pos = text.rfind("\n") + 1
            if (l_pos > 0 or line_starting) and _WHITESPACE.fullmatch(text, l_pos):
                text = text[:l_pos]
        if text:
            tokens.append((line, "data", text))
        line += m.group(1).count("\n")
        if kind == "raw_begin":
            raise _unsupported("'{% raw %}'", line)
        pos = m.end()
        if kind == "comment_begin":
            end = _COMMENT_END.match(source, pos)
            if end is None:
                raise ChatTemplateSyntaxError(f"chat template line {line}: missing end of comment tag")
            line += end.group().count("\n")
            pos, line_starting = end.end(), end.group().endswith("\n")
            continue
        end_re = _VARIABLE_END if kind == "variable_begin" else _BLOCK_END
        tokens.append((line, "begin_var" if kind == "variable_begin" else "begin_block", ""))
        stack = []
        while True:
            if pos >= len(source):
                raise ChatTemplateSyntaxError(f"chat template line {line}: unexpected end of template inside a tag")
            end = None if stack else end_re.match(source, pos)
            if end is not None:
                tokens.append((line, "end_var" if kind == "variable_begin" else "end_block", ""))
                line += end.group().count("\n")
                pos, line_starting = end.end(), end.group().endswith("\n")
                break
            t = _TOKEN.match(source, pos)
            if t is None:
                raise ChatTemplateSyntaxError(f"chat template line {line}: unexpected character {source[pos]!r}")
            value, tkind = t.group(), t.lastgroup
            if tkind == "float" or tkind == "int":
                tokens.append((line, tkind, (float if tkind == "float" else int)(value.replace("_", ""))))
            elif tkind == "string":
                unescaped = value[1:-1].encode("ascii", "backslashreplace").decode("unicode-escape")
                tokens.append((line, "string", unescaped))
            elif tkind != "ws":
                if value in _CLOSING:
                    stack.append(_CLOSING[value])
                elif value in (")", "]", "}"):
                    if not stack or stack.pop() != value:
                        raise ChatTemplateSyntaxError(f"chat template line {line}: unexpected {value!r}")
                tokens.append((line, tkind, value))
            line += value.count("\n")
            pos, line_starting = t.end(), value.endswith("\n")
    return tokens


# -- parser ---------------------------------------------------------------------------------------
# Statements: ("output", line, parts) / ("if", line, [(test, body)], else_body) /
# ("for", line, target, iter, cond, body, else_body) / ("set", line, target, expr) /
# ("scope", line, body) / ("break", line) / ("continue", line).
# Expressions are tuples (kind, line, ...), evaluated by _Renderer.eval.

_UNSUPPORTED_TAGS = {"macro", "call", "filter", "block", "extends", "include", "import", "from", "with",
                     "autoescape", "do", "endmacro", "endcall", "endfilter", "endblock", "endwith",
                     "endautoescape", "trans", "pluralize", "endtrans"}
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}



def _static(node):
    """Whether jinja2's compiler folds `node` to a constant: no variable and no call anywhere in it."""
    if isinstance(node, tuple) and len(node) > 1 and isinstance(node[0], str) and isinstance(node[1], int):
        return node[0] not in ("name", "call") and all(_static(x) for x in node[2:])
    if isinstance(node, (list, tuple)):
        return all(_static(x) for x in node)
    return True

class _Parser:
    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    # token helpers
    @property
    def current(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (self.tokens[-1][0] if self.tokens else 1,
                                                                        "eof", None)

    def next(self):
        token = self.current
        self.i += 1
        return token

    def at(self, kind, value=None):
        _, k, v = self.current
        return k == kind and (value is None or v == value)

    def skip(self, kind, value=None):
        if self.at(kind, value):
            self.i += 1
            return True
        return False

    def expect(self, kind, value=None):
        line, k, v = self.current
        if k != kind or value is not None and v != value:
            want = value if value is not None else kind
            raise ChatTemplateSyntaxError(f"chat template line {line}: expected {want!r}, got {v if v is not None else k!r}")
        self.i += 1
        return v

    # statements
    def parse(self):
        return self.subparse(())[0]

    def subparse(self, end_names, opener=None):
        """Statements up to one of the block tags end_names (closing opener, a (tag, line)); returns
        (body, that tag's name)."""
        body = []
        while self.i < len(self.tokens):
            line, kind, value = self.next()
            if kind == "data":
                body.append(("output", line, [value]))
            elif kind == "begin_var":
                expr = self.parse_tuple()
                self.expect("end_var")
                body.append(("output", line, [expr]))
            else:  # begin_block
                name_line, _, name = self.current
                name = self.expect("name")
                if name in end_names:
                    return body, name
                body.append(self.parse_statement(name, name_line))
        if end_names:
            raise ChatTemplateSyntaxError(f"chat template line {opener[1]}: '{{% {opener[0]} %}}' is never closed: expected "
                             f"{' or '.join(repr('{% ' + n + ' %}') for n in end_names)}")
        return body, None

    def parse_statement(self, name, line):
        if name == "if":
            branches, test = [], self.parse_or()
            while True:
                self.expect("end_block")
                body, end = self.subparse(("elif", "else", "endif"), (name, line))
                branches.append((test, body))
                if end == "elif":
                    test = self.parse_or()
                    continue
                else_body = []
                if end == "else":
                    self.expect("end_block")
                    else_body, _ = self.subparse(("endif",), (name, line))
                self.expect("end_block")
                return ("if", line, branches, else_body)
        if name == "for":
            target = self.parse_target()
            self.expect("name", "in")
            iterable = self.parse_or()
            cond = self.parse_expression() if self.skip("name", "if") else None
            if self.at("name", "recursive"):
                raise _unsupported("a recursive for loop", line)
            self.expect("end_block")
            body, end = self.subparse(("else", "endfor"), (name, line))
            else_body = []
            if end == "else":
                self.expect("end_block")
                else_body, _ = self.subparse(("endfor",), (name, line))
            self.expect("end_block")
            return ("for", line, target, iterable, cond, body, else_body)
        if name == "set":
            target = self.parse_target(allow_attribute=True)
            if not self.skip("op", "="):
                raise _unsupported("a block set ('{% set x %}...{% endset %}')", line)
            expr = self.parse_tuple()
            self.expect("end_block")
            return ("set", line, target, expr)
        if name == "generation":
            self.expect("end_block")
            body, _ = self.subparse(("endgeneration",), (name, line))
            self.expect("end_block")
            return ("scope", line, body)
        if name in ("break", "continue"):
            self.expect("end_block")
            return (name, line)
        if name in _UNSUPPORTED_TAGS:
            raise _unsupported(f"'{{% {name} %}}'", line)
        raise ChatTemplateSyntaxError(f"chat template line {line}: unknown tag {name!r}")

    def parse_target(self, allow_attribute=False):
        line = self.current[0]
        names = [self.expect("name")]
        if allow_attribute and self.skip("op", "."):
            return ("nsattr", line, names[0], self.expect("name"))
        while self.skip("op", ","):
            names.append(self.expect("name"))
        return ("name", line, names[0]) if len(names) == 1 else ("names", line, names)

    # expressions, jinja2's precedence: condexpr < or < and < not < compare < +,- < ~ < *,/,//,% < ** < unary
    def parse_tuple(self):
        line = self.current[0]
        items, is_tuple = [self.parse_expression()], False
        while self.skip("op", ","):
            is_tuple = True
            if self.at("end_var") or self.at("end_block"):
                break
            items.append(self.parse_expression())
        return ("tuple", line, items) if is_tuple else items[0]

    def parse_expression(self):
        expr = self.parse_or()
        while self.at("name", "if"):
            line = self.next()[0]
            test = self.parse_or()
            other = self.parse_expression() if self.skip("name", "else") else None
            expr = ("cond", line, test, expr, other)
        return expr

    def parse_or(self):
        left = self.parse_and()
        while self.at("name", "or"):
            line = self.next()[0]
            left = ("or", line, left, self.parse_and())
        return left

    def parse_and(self):
        left = self.parse_not()
        while self.at("name", "and"):
            line = self.next()[0]
            left = ("and", line, left, self.parse_not())
        return left

    def parse_not(self):
        if self.at("name", "not"):
            line = self.next()[0]
            return ("not", line, self.parse_not())
        return self.parse_compare()

    def parse_compare(self):
        line = self.current[0]
        expr, ops = self.parse_math1(), []
        while True:
            _, kind, value = self.current
            if kind == "op" and value in _COMPARE:
                self.next()
                ops.append((value, self.parse_math1()))
            elif self.at("name", "in"):
                self.next()
                ops.append(("in", self.parse_math1()))
            elif self.at("name", "not") and self.tokens[self.i + 1][1:] == ("name", "in"):
                self.i += 2
                ops.append(("not in", self.parse_math1()))
            else:
                break
        return ("compare", line, expr, ops) if ops else expr

    def _binary(self, operators, operand):
        left = operand()
        while self.current[1] == "op" and self.current[2] in operators:
            line, _, op = self.next()
            left = ("bin", line, op, left, operand())
        return left

    def parse_math1(self):
        return self._binary(("+", "-"), self.parse_concat)

    def parse_concat(self):
        line = self.current[0]
        items = [self.parse_math2()]
        while self.skip("op", "~"):
            items.append(self.parse_math2())
        return items[0] if len(items) == 1 else ("concat", line, items)

    def parse_math2(self):
        return self._binary(("*", "/", "//", "%"), self.parse_pow)

    def parse_pow(self):
        return self._binary(("**",), self.parse_unary)

    def parse_unary(self, with_filter=True):
        line, kind, value = self.current
        if kind == "op" and value in ("-", "+"):
            self.next()
            node = ("unary", line, value, self.parse_unary(False))
        else:
            node = self.parse_primary()
        node = self.parse_postfix(node)
        return self.parse_filter_expr(node) if with_filter else node

    def parse_primary(self):
        line, kind, value = self.next()
        if kind == "name":
            if value in ("true", "True"):
                return ("const", line, True)
            if value in ("false", "False"):
                return ("const", line, False)
            if value in ("none", "None"):
                return ("const", line, None)
            return ("name", line, value)
        if kind == "string":
            while self.at("string"):  # adjacent string literals are one string
                value += self.next()[2]
            return ("const", line, value)
        if kind in ("int", "float"):
            return ("const", line, value)
        if kind == "op" and value == "(":
            if self.skip("op", ")"):
                return ("tuple", line, [])
            expr = self.parse_expression()
            if self.at("op", ","):
                items = [expr]
                while self.skip("op", ","):
                    if self.at("op", ")"):
                        break
                    items.append(self.parse_expression())
                expr = ("tuple", line, items)
            self.expect("op", ")")
            return expr
        if kind == "op" and value == "[":
            items = []
            while not self.skip("op", "]"):
                if items:
                    self.expect("op", ",")
                    if self.skip("op", "]"):
                        break
                items.append(self.parse_expression())
            return ("list", line, items)
        if kind == "op" and value == "{":
            pairs = []
            while not self.skip("op", "}"):
                if pairs:
                    self.expect("op", ",")
                    if self.skip("op", "}"):
                        break
                key = self.parse_expression()
                self.expect("op", ":")
                pairs.append((key, self.parse_expression()))
            return ("dict", line, pairs)
        raise ChatTemplateSyntaxError(f"chat template line {line}: unexpected {value if value is not None else kind!r}")

    def parse_postfix(self, node):
        while True:
            line, kind, value = self.current
            if kind == "op" and value == ".":
                self.next()
                _, k, v = self.next()
                if k == "int":
                    node = ("getitem", line, node, ("const", line, v))
                elif k == "name":
                    node = ("getattr", line, node, v)
                else:
                    raise ChatTemplateSyntaxError(f"chat template line {line}: expected a name after '.'")
            elif kind == "op" and value == "[":
                self.next()
                node = ("getitem", line, node, self.parse_subscript())
                self.expect("op", "]")
            elif kind == "op" and value == "(":
                node = self.parse_call(node)
            else:
                return node

    def parse_subscript(self):
        line = self.current[0]
        parts, part = [], None
        while True:
            if self.at("op", ":") or self.at("op", "]"):
                parts.append(part)
                part = None
                if not self.skip("op", ":"):
                    break
            else:
                part = self.parse_expression()
        if len(parts) == 1:
            if parts[0] is None:
                raise ChatTemplateSyntaxError(f"chat template line {line}: empty subscript")
            return parts[0]
        if len(parts) > 3:
            raise ChatTemplateSyntaxError(f"chat template line {line}: invalid slice")
        return ("slice", line, *(parts + [None] * (3 - len(parts))))

    def parse_call_args(self):
        self.expect("op", "(")
        args, kwargs = [], []
        while not self.skip("op", ")"):
            if args or kwargs:
                self.expect("op", ",")
                if self.skip("op", ")"):
                    break
            line = self.current[0]
            if self.at("op", "*") or self.at("op", "**"):
                raise _unsupported("*args / **kwargs in a call", line)
            if self.at("name") and self.tokens[self.i + 1][1:] == ("op", "="):
                name = self.next()[2]
                self.next()
                kwargs.append((name, self.parse_expression()))
            else:
                if kwargs:
                    raise ChatTemplateSyntaxError(f"chat template line {line}: positional argument after a keyword argument")
                args.append(self.parse_expression())
        return args, kwargs

    def parse_call(self, node):
        line = self.current[0]
        args, kwargs = self.parse_call_args()
        return ("call", line, node, args, kwargs)

    def parse_filter_expr(self, node):
        while True:
            line, kind, value = self.current
            if kind == "op" and value == "|":
                self.next()
                name = self.expect("name")
                if name not in FILTERS:
                    raise _unsupported(f"the filter {name!r}", line)
                args, kwargs = self.parse_call_args() if self.at("op", "(") else ([], [])
                node = ("filter", line, node, name, args, kwargs)
            elif kind == "name" and value == "is":
                self.next()
                negate = self.skip("name", "not")
                name = self.expect("name")
                if name not in TESTS:
                    raise _unsupported(f"the test {name!r}", line)
                if self.at("op", "("):
                    args, kwargs = self.parse_call_args()
                    if kwargs:
                        raise _unsupported("keyword arguments to a test", line)
                elif (self.current[1] in ("name", "string", "int", "float")
                      or self.current[1] == "op" and self.current[2] in ("(", "[", "{")) \
                        and not (self.at("name", "else") or self.at("name", "or") or self.at("name", "and")):
                    args = [self.parse_postfix(self.parse_primary())]
                else:
                    args = []
                node = ("test", line, node, name, args, negate)
            elif kind == "op" and value == "(":
                node = self.parse_call(node)
            else:
                return node


# -- jinja2's compile-time scoping ------------------------------------------------------------------

def _names(expr):
    """The names an expression reads."""
    if isinstance(expr, tuple) and len(expr) == 3 and expr[0] == "name" and isinstance(expr[1], int):
        yield expr[2]
    elif isinstance(expr, (tuple, list)):
        for part in expr:
            if isinstance(part, (tuple, list)):
                yield from _names(part)


class _Frame:
    """jinja2's idtracking.Symbols for one frame: the names it refers to (refs), stores, and those
    whose first reference is an unconditional store while no enclosing frame refers to them (unset:
    jinja2 starts them as undefined, not as the context's value)."""

    def __init__(self, outer, params=()):
        self.outer, self.refs, self.stores, self.unset = outer, set(params), set(params), set()

    def load(self, names):
        self.refs.update(n for n in names if n not in self.outer)

    def store(self, name):
        self.stores.add(name)
        if name not in self.refs:
            self.refs.add(name)
            if name not in self.outer:
                self.unset.add(name)


def _scoping(body, outer=frozenset(), params=(), out=None):
    """{id(frame body): names unset at its entry} for the template body and every loop body, loop
    else and generation body in it (jinja2 analyses a frame whole before the frames nested in it)."""
    out = {} if out is None else out
    frame, nested = _Frame(outer, params), []

    def visit(statements, symbols):
        for node in statements:
            kind = node[0]
            if kind == "output":
                symbols.load(n for part in node[2] if not isinstance(part, str) for n in _names(part))
            elif kind == "set":
                symbols.load(_names(node[3]))
                target = node[2]
                if target[0] == "nsattr":
                    symbols.load([target[2]])
                for name in [target[2]] if target[0] == "name" else target[2] if target[0] == "names" else []:
                    symbols.store(name)
            elif kind == "if":  # jinja2's branch_update: a name first stored in a branch is not unset
                symbols.load(_names(node[2][0][0]))
                branches = []
                for k, body in enumerate([b for _, b in node[2]] + [node[3]]):
                    branch = _Frame(symbols.outer)
                    branch.refs, branch.stores = set(symbols.refs), set(symbols.stores)
                    if 0 < k < len(node[2]):
                        branch.load(_names(node[2][k][0]))
                    visit(body, branch)
                    branches.append(branch)
                for branch in branches:
                    symbols.refs |= branch.refs
                    symbols.stores |= branch.stores
            elif kind == "for":
                symbols.load(_names(node[3]))
                target = node[2]
                nested.append((node[5], [target[2]] if target[0] == "name" else target[2]))
                nested.append((node[6], []))
            elif kind == "scope":
                nested.append((node[2], []))

    visit(body, frame)
    if frame.unset:
        out[id(body)] = frozenset(frame.unset)
    for child, child_params in nested:
        _scoping(child, outer | frame.refs, [*child_params, "loop"], out)
    return out


# -- renderer --------------------------------------------------------------------------------------

_UNSET = object()  # a name jinja2 has not bound yet in this frame

class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
           "//": lambda a, b: a // b, "%": lambda a, b: a % b, "**": lambda a, b: a ** b,
           "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
           "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
           "in": lambda a, b: a in b, "not in": lambda a, b: a not in b}


class _Renderer:
    def __init__(self, context, body, unset):
        self.unset, self.out = unset, []
        self.scopes = [dict(GLOBALS), dict(context), self.frame(body)]  # globals, the caller's, the template's

    def frame(self, body):
        """The scope a frame starts with."""
        return dict.fromkeys(self.unset.get(id(body), ()), _UNSET)

    def lookup(self, name, line):
        for scope in reversed(self.scopes):
            if name in scope:
                value = scope[name]
                return Undefined(f"{name!r} is undefined") if value is _UNSET else value
        if name in _UNSUPPORTED_GLOBALS:
            raise _unsupported(f"the global {name!r}", line)
        return Undefined(f"{name!r} is undefined")

    def assign(self, target, value):
        kind, line = target[0], target[1]
        if kind == "name":
            self.scopes[-1][target[2]] = value
        elif kind == "names":
            values = list(value)
            if len(values) != len(target[2]):
                raise ChatTemplateError(f"cannot unpack {len(values)} values into {len(target[2])} names")
            self.scopes[-1].update(zip(target[2], values))
        else:  # nsattr
            ns = self.lookup(target[2], line)
            if not isinstance(ns, _Namespace):
                raise ChatTemplateError("cannot assign attribute on non-namespace object")
            _Namespace.check_name(target[3])
            ns.attrs[target[3]] = value

    def run(self, body):
        for node in body:
            kind, line = node[0], node[1]
            if kind == "output":
                for part in node[2]:
                    self.out.append(part if isinstance(part, str) else _to_str(self.eval(part), line))
            elif kind == "if":
                for test, branch in node[2]:
                    if self.eval(test):
                        self.run(branch)
                        break
                else:
                    self.run(node[3])
            elif kind == "for":
                self.run_for(*node[2:])
            elif kind == "set":
                self.assign(node[2], self.eval(node[3]))
            elif kind == "scope":
                self.run_scope(node[2])
            elif kind == "break":
                raise _Break()
            else:
                raise _Continue()

    def run_scope(self, body):
        """body in a scope of its own: what it sets does not outlive it."""
        self.scopes.append(self.frame(body))
        try:
            self.run(body)
        finally:
            self.scopes.pop()

    def run_for(self, target, iterable, cond, body, else_body):
        items = list(self.eval(iterable))
        if cond is not None:
            kept = []
            for item in items:
                self.scopes.append({})
                self.assign(target, item)
                if self.eval(cond):
                    kept.append(item)
                self.scopes.pop()
            items = kept
        completed = False  # jinja2 runs `else` unless some iteration reached the end of the body
        for index0, item in enumerate(items):
            self.scopes.append({**self.frame(body), "loop": _Loop(items, index0)})
            try:
                self.assign(target, item)
                self.run(body)
                completed = True
            except _Continue:
                pass
            except _Break:
                break
            finally:
                self.scopes.pop()
        if not completed:
            self.run_scope(else_body)

    def eval(self, node):
        kind, line = node[0], node[1]
        if kind == "const":
            return node[2]
        if kind == "name":
            return self.lookup(node[2], line)
        if kind == "getattr":
            return _getattr(self.eval(node[2]), node[3], line)
        if kind == "getitem":
            return _getitem(self.eval(node[2]), self.eval(node[3]), line)
        if kind == "slice":
            return slice(*(None if part is None else self.eval(part) for part in node[2:]))
        if kind == "call":
            fn = self.eval(node[2])
            return _call(fn, [self.eval(a) for a in node[3]], {k: self.eval(v) for k, v in node[4]}, line)
        if kind == "filter":
            args = [self.eval(a) for a in node[4]]
            return _apply_filter(node[3], self.eval(node[2]), args, {k: self.eval(v) for k, v in node[5]}, line)
        if kind == "test":
            result = bool(TESTS[node[3]](self.eval(node[2]), *(self.eval(a) for a in node[4])))
            return not result if node[5] else result
        if kind == "bin":
            left = self.eval(node[3])
            if node[2] == "**" and isinstance(left, (int, float)) and not isinstance(left, bool) and left < 0 and \
                    _static(node[3]) and not _static(node[4]):
                # jinja2 folds the base to a literal and writes Python `(-2 ** x)`, which is -(2 ** x)
                return -((-left) ** self.eval(node[4]))
            return _BINARY[node[2]](left, self.eval(node[4]))
        if kind == "unary":
            value = self.eval(node[3])
            return -value if node[2] == "-" else +value
        if kind == "not":
            return not self.eval(node[2])
        if kind == "and":
            return self.eval(node[2]) and self.eval(node[3])
        if kind == "or":
            return self.eval(node[2]) or self.eval(node[3])
        if kind == "compare":
            left = self.eval(node[2])
            for op, operand in node[3]:
                right = self.eval(operand)
                if not _BINARY[op](left, right):
                    return False
                left = right
            return True
        if kind == "cond":
            if self.eval(node[2]):
                return self.eval(node[3])
            return Undefined("the inline if-expression evaluated to false and no else section was defined") \
                if node[4] is None else self.eval(node[4])
        if kind == "concat":
            return "".join(_to_str(self.eval(item), line) for item in node[2])
        if kind == "list":
            return [self.eval(item) for item in node[2]]
        if kind == "tuple":
            return tuple(self.eval(item) for item in node[2])
        return {self.eval(k): self.eval(v) for k, v in node[2]}  # dict


class ChatTemplate:
    """A parsed chat template; render(**context) -> str."""

    def __init__(self, source):
        if not isinstance(source, str):
            raise TypeError(f"a chat template must be a str, got {type(source).__name__}")
        self.source = source
        self.body = _Parser(_tokenize(source)).parse()
        self.unset = _scoping(self.body)

    def render(self, **context):
        renderer = _Renderer(context, self.body, self.unset)
        renderer.run(self.body)
        return "".join(renderer.out)


@lru_cache(maxsize=16)
def _compiled(source):
    return ChatTemplate(source)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value, where):
    """The JSON-like data a template may see (transformers' _plain_template_data, without the media
    placeholders: anything else is refused)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, where) for v in value)
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    item = getattr(value, "item", None)  # a NumPy scalar
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item(), where)
    raise TypeError(f"{where}: a chat template can only see JSON-like data, got {type(value).__name__}")


def render_chat(template, messages, add_generation_prompt=False, tools=None, documents=None,
                special_tokens=None, **kwargs):
    """The text transformers' apply_chat_template(messages, tokenize=False, ...) renders.

    special_tokens: {"bos_token": ..., "eos_token": ...} (those that are set), as transformers puts
    them in the context; kwargs (e.g. enable_thinking) override them and reach the template.
    Messages are read as transformers reads them: keys whose value is None are dropped, and a
    reasoning field (reasoning_content, thinking or reasoning) is copied to 'thinking' and
    'reasoning_content'.
    """
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    chat = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{k}] must be a dict, got {type(message).__name__}")
        message = _plain({key: value for key, value in message.items() if value is not None}, f"messages[{k}]")
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise NotImplementedError("tools must be JSON schemas (dicts); lora_np does not convert functions")
    context = {**(special_tokens or {}), **_plain(kwargs, "chat template keyword arguments")}
    return _compiled(template).render(messages=chat, tools=_plain(tools, "tools"),
                                      documents=_plain(documents, "documents"),
                                      add_generation_prompt=add_generation_prompt, **context)
