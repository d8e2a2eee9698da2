"""50 concurrent clients against a real ``strata serve`` while its ``champion`` moves: none may fail.

Runs benchmarks/serving_load.py for a few seconds on the tiny model; its figures are checked for
correctness only (errors, versions, the swap), never for speed.
"""

import json

from benchmarks import serving_load


def test_fifty_clients_see_no_error_and_the_champion_move_drops_no_request(capsys):
    figures = serving_load.main(["--clients", "50", "--seconds", "3"])
    assert json.loads(capsys.readouterr().out) == figures  # the printed document is the returned one
    assert figures["errors"] == {"count": 0, "first": []}
    assert figures["non_2xx"] == {"count": 0, "first": []}
    assert figures["requests"] > figures["clients"]  # every client went round more than once
    assert set(figures["versions_before_move"]) == {"1"}  # the server cannot swap before the alias moves
    assert figures["versions_after_move"].get("2", 0) > 0 and figures["reload_observed"]
    assert figures["during_swap"]["requests"] > 0 and figures["during_swap"]["failed"] == 0
    assert figures["old_version_after_reload"] == 0  # once v2 answered, every later request got v2
    assert figures["server_logged_reload"]
    assert figures["refused_without_the_key"] == {"missing_key": 401, "wrong_key": 401}
    assert not figures["keys_in_server_log"]  # neither the right key nor the wrong one a client sent
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
