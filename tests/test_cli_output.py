"""`swarm`'s table output when piped: whole lines, whatever the terminal's width."""

from __future__ import annotations

from swarm_cli import output


def test_a_piped_table_keeps_each_row_on_one_line(capsys):
    sha256 = "ab" * 32
    output.table([{"version": 1, "sha256": sha256, "created_at": "2026-11-30T11:41:07+00:00"},
                  {"version": 2, "sha256": "cd" * 32, "created_at": "2026-11-30T11:42:00+00:00"}])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the header and two rows: nothing folded at 80 columns
    assert sha256 in lines[1] and lines[1].rstrip().endswith("2026-11-30T11:41:07+00:00")
