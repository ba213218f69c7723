"""The Asterisk config parser against tricky syntax, judged by Asterisk 22's loader rules."""

from __future__ import annotations

import pytest

from provisioner.asterisk_conf import LINE_MAX_BYTES, Directive, Section, parse
from provisioner.errors import AsteriskSyntaxError


def options(text: str | bytes, name: str = "s") -> tuple[tuple[str, str], ...]:
    """The options of the first section called ``name``."""
    return next(s for s in parse(text).sections if s.name == name).options


def test_plain_sections_and_options() -> None:
    """Sections keep their order; options keep theirs, stripped of blanks."""
    parsed = parse("[a]\n x = 1 \n\ty=2\r\n[b]\nz=3\n")
    assert parsed.sections == (
        Section("a", 1, options=(("x", "1"), ("y", "2"))),
        Section("b", 4, options=(("z", "3"),)),
    )
    assert parsed.directives == ()
    assert parsed.notices == ()


def test_comments_and_escaped_semicolons() -> None:
    """';' starts a comment; '\\;' is a literal ';' without its backslash."""
    assert options("[s]\na=b ; comment\nc=d\\;e\n; whole line\n") == (("a", "b"), ("c", "d;e"))


def test_double_backslash_still_escapes() -> None:
    """Asterisk has no escape for the backslash itself: '\\\\;' keeps one backslash and the ';'."""
    assert options("[s]\na=x\\\\;y\n") == (("a", "x\\;y"),)


def test_block_comment_across_lines() -> None:
    """';--' ... '--;' hides everything between, over several lines."""
    text = "[s]\na=1 ;-- start\n[hidden]\nb=2\nend --; c=3\nd=4\n"
    parsed = parse(text)
    assert [s.name for s in parsed.sections] == ["s"]
    assert parsed.sections[0].options == (("a", "1"), ("c", "3"), ("d", "4"))


def test_inline_block_comment_joins_the_rest() -> None:
    """Text after an inline block comment is joined to the text before it."""
    assert options("[s]\nx=y;--blk--;z\n") == (("x", "yz"),)


def test_nested_block_comments() -> None:
    """Block comments nest: one '--;' closes only the innermost."""
    text = "[s]\n;-- outer ;-- inner --; still hidden=1\nhidden=2 --;\nseen=3\n"
    assert options(text) == (("seen", "3"),)


def test_three_dashes_is_a_plain_comment() -> None:
    """';---' is not a block comment start: only the rest of that line is a comment."""
    assert options("[s]\na=1 ;--- not a block\nb=2\n") == (("a", "1"), ("b", "2"))


def test_stray_block_end_hides_the_rest() -> None:
    """A '--;' outside a block comment keeps its line whole and hides the lines after it."""
    parsed = parse("[s]\nk=v--;w\nafter=gone\n[t]\n")
    assert parsed.sections == (Section("s", 1, options=(("k", "v--;w"),)),)
    assert any("stray" in n.message for n in parsed.notices)


def test_templates_and_inheritance() -> None:
    """'(!)' marks a template; '(a,b)' copies their options first, in order."""
    text = "[t1](!)\nx=1\n[t2](!)\ny=2\n[s](t1,t2)\nz=3\n"
    parsed = parse(text)
    s = parsed.sections[2]
    assert s.inherits == ("t1", "t2")
    assert not s.template
    assert s.options == (("x", "1"), ("y", "2"), ("z", "3"))
    assert [v.name for v in parsed.visible()] == ["s"]


def test_inheritance_is_case_insensitive_and_first_match() -> None:
    """A base is found by name ignoring ASCII case; the first of that name wins."""
    text = "[Base]\nx=1\n[base]\nx=2\n[s](BASE)\n"
    assert options(text) == (("x", "1"),)


def test_empty_inheritance_copies_the_first_section() -> None:
    """'()' names the empty string, which Asterisk matches to the very first section."""
    assert options("[first]\nq=1\n[s]()\n") == (("q", "1"),)


def test_unknown_base_refuses_the_file() -> None:
    """Inheriting from a section that does not exist yet makes Asterisk drop the file."""
    with pytest.raises(AsteriskSyntaxError) as info:
        parse("[s](later)\n[later]\n")
    assert info.value.line == 1


def test_plus_appends_to_the_earlier_section() -> None:
    """'[name](+)' adds options to the earlier non-template section of that name."""
    parsed = parse("[s]\na=1\n[other]\n[S](+)\nb=2\n")
    assert [s.name for s in parsed.sections] == ["s", "other"]
    assert parsed.sections[0].options == (("a", "1"), ("b", "2"))


def test_plus_without_a_section_refuses_the_file() -> None:
    """'(+)' with nothing to add to makes Asterisk drop the file."""
    with pytest.raises(AsteriskSyntaxError):
        parse("[t](!)\n[t](+)\n")


def test_filtered_plus_appends_to_the_section_whose_options_match() -> None:
    """'[name](+type=aor)' adds to the first section of that name with an option matching
    the filter (name and value as regular expressions, '&' joining several), as in
    Asterisk's "Adding to an existing section"; no match refuses the file."""
    text = (
        "[101]\ntype=endpoint\nallow=ulaw\n[101]\ntype=aor\ndefault_expiration=3600\n"
        "[101](+type=aor)\ndefault_expiration=1200\n[101](+ type=endpoint & allow=u.aw )\n"
        "allow=g722\n[101](+default_.*=36[0-9][0-9])\nmax_contacts=2\n"
    )
    endpoint, aor = parse(text).sections
    assert endpoint.options == (("type", "endpoint"), ("allow", "ulaw"), ("allow", "g722"))
    assert aor.options == (
        ("type", "aor"),
        ("default_expiration", "3600"),
        ("default_expiration", "1200"),
        ("max_contacts", "2"),
    )
    for header in ("[101](+type=identify)", "[101](+type)", "[101](+type=endpoint&x=y)"):
        with pytest.raises(AsteriskSyntaxError, match="does not exist"):
            parse(text + header + "\n")


def test_filtered_plus_skips_templates_unless_asked() -> None:
    """A filtered addition passes over templates, unless the filter has TEMPLATES=include."""
    text = "[t](!)\ntype=aor\n[t]\ntype=aor\n"
    template, section = parse(text + "[t](+type=aor)\nx=1\n").sections
    assert (template.options, section.options) == (
        (("type", "aor"),),
        (("type", "aor"), ("x", "1")),
    )
    template, section = parse(text + "[t](+TEMPLATES=include&type=aor)\nx=1\n").sections
    assert template.options == (("type", "aor"), ("x", "1"))


def test_section_name_rules() -> None:
    """Names run to the first ']', unstripped; text after ']' that is not '(' is ignored."""
    names = [s.name for s in parse("[ a ]\n[b] junk (x)\n[c]x(!)\n").sections]
    assert names == [" a ", "b", "c"]


def test_section_names_are_cut_to_79_bytes() -> None:
    """Asterisk keeps at most 79 bytes of a section name."""
    assert parse("[" + "x" * 100 + "]\n").sections[0].name == "x" * 79


@pytest.mark.parametrize(
    "text",
    ["[s\n", "[s](!\n", "a=1\n[s]\n", "[s]\n\\ x=1\n", "[s]\n\\\n", "[a;b]\n", "[s](+x=y)\n"],
)
def test_lines_that_refuse_the_whole_file(text: str) -> None:
    """Unclosed headers, options before any section and bad escapes raise AsteriskSyntaxError."""
    with pytest.raises(AsteriskSyntaxError):
        parse(text)


def test_object_arrow_and_equals_in_values() -> None:
    """'=>' sets an option like '='; only the first '=' splits; '= >' keeps the '>'."""
    assert options("[s]\na => 1\nb=>2\nc = > 3\nd=x=y\n") == (
        ("a", "1"),
        ("b", "2"),
        ("c", "> 3"),
        ("d", "x=y"),
    )


def test_plus_equals_appends_raw_text() -> None:
    """'name += more' appends 'more' to the last value of that name, blanks included."""
    assert options("[s]\nallow=ulaw\nallow += ,alaw\nallow+=,g722\n") == (
        ("allow", "ulaw ,alaw,g722"),
    )


def test_plus_equals_without_an_earlier_option() -> None:
    """'name += value' with no earlier 'name' sets it normally."""
    assert options("[s]\nallow += ulaw \n") == (("allow", "ulaw"),)


def test_plus_equals_looks_up_by_exact_name() -> None:
    """The earlier option is found by exact (case-sensitive) name."""
    assert options("[s]\nAllow=ulaw\nallow+=alaw\n") == (("Allow", "ulaw"), ("allow", "alaw"))


def test_plus_equals_updates_the_first_case_insensitive_match() -> None:
    """The new value lands on the first option matching name and value ignoring case."""
    assert options("[s]\nA=X\na=x\na+=y\n") == (("a", "xy"), ("a", "x"))


def test_plus_equals_reaches_inherited_options() -> None:
    """'+=' extends an option copied from a template."""
    assert options("[t](!)\nallow=ulaw\n[s](t)\nallow+=,alaw\n") == (("allow", "ulaw,alaw"),)


def test_escaped_first_character() -> None:
    """A leading backslash escapes the first character: '\\=a=b' names the option '=a'."""
    assert options("[s]\n\\=a=b\n\\[x=1\n") == (("=a", "b"), ("[x", "1"))


def test_directives_are_reported_not_followed() -> None:
    """#include, #tryinclude and #exec (any case) are reported with their unquoted argument."""
    text = '#include "a.conf"\n[s]\n#TryInclude <b*.conf>\n  #exec /bin/evil --x \nk=v\n'
    parsed = parse(text)
    assert parsed.directives == (
        Directive("include", "a.conf", 1),
        Directive("tryinclude", "b*.conf", 3),
        Directive("exec", "/bin/evil --x", 4),
    )
    assert all(d.known for d in parsed.directives)
    assert options(text) == (("k", "v"),)


def test_unknown_and_empty_directives_are_reported_with_a_notice() -> None:
    """'#foo x' and a bare '#include' are reported and noted as ignored."""
    parsed = parse("#foo x\n#include\n#\n")
    assert [(d.name, d.argument) for d in parsed.directives] == [
        ("foo", "x"),
        ("include", None),
        ("", None),
    ]
    assert not parsed.directives[0].known
    assert len(parsed.notices) == 3


def test_directive_words_stop_at_non_ascii_bytes() -> None:
    """A byte of 128 or more ends the directive word (C's signed char) and is dropped."""
    parsed = parse("#includeé x\n".encode())
    assert parsed.directives[0].name == "include"


def test_directive_inside_comment_or_value_is_not_a_directive() -> None:
    """'#include' in a block comment or in the middle of a value is no directive."""
    parsed = parse("[s]\n;--\n#include x\n--;\na=b #include y\n")
    assert parsed.directives == ()
    assert parsed.sections[0].options == (("a", "b #include y"),)


def test_line_without_equals_is_noted_and_ignored() -> None:
    """A line with no '=' or no name is ignored with a notice."""
    parsed = parse("[s]\njunk\n=value\nok=1\n")
    assert parsed.sections[0].options == (("ok", "1"),)
    assert [n.line for n in parsed.notices] == [2, 3]


def test_cr_does_not_end_a_line() -> None:
    """Only LF ends a line: a CR in the middle stays in the value."""
    assert options("[s]\na=b\rc=d\n") == (("a", "b\rc=d"),)


def test_nul_ends_the_line() -> None:
    """Bytes after a NUL are invisible to Asterisk."""
    assert options(b"[s]\na=b\0c\nd=e\n") == (("a", "b"), ("d", "e"))


def test_byte_order_mark_on_line_one() -> None:
    """A UTF-8 BOM before the first line is ignored."""
    assert parse("\ufeff[s]\n").sections[0].name == "s"


def test_long_lines_are_skipped() -> None:
    """A line of 8191 bytes or more is skipped whole; one byte less is kept."""
    kept = "a=" + "x" * (LINE_MAX_BYTES - 3)
    skipped = "b=" + "y" * (LINE_MAX_BYTES * 2)
    parsed = parse(f"[s]\n{kept}\n{skipped}\nc=1\n")
    assert [n for n, _ in parsed.sections[0].options] == ["a", "c"]
    assert len(parsed.notices) == 1
    assert parsed.notices[0].line == 3


def test_long_line_is_measured_in_bytes() -> None:
    """The limit counts UTF-8 bytes, not characters."""
    line = "a=" + "é" * (LINE_MAX_BYTES // 2)
    assert parse(f"[s]\n{line}\n").sections[0].options == ()


def test_unterminated_block_comment_is_noted() -> None:
    """A block comment still open at the end of the file gives a notice."""
    assert parse("[s]\n;-- open\n").notices


def test_utf8_survives() -> None:
    """Names and values come back as the text that was written."""
    assert options('[s]\ncallerid="Zoë Ørsted ☎" <1001>\n') == (
        ("callerid", '"Zoë Ørsted ☎" <1001>'),
    )
