"""The start-up line on pulls says what the windows decided, and why. No MPI."""

from mpips.startup import pull_line


def test_pull_line_says_the_mode_used_and_why():
    assert pull_line("auto", "rma", "rma") == "pulls: one-sided MPI_Get from the servers' windows (rma)"
    fell_back = pull_line("auto", "rma", "message")
    assert fell_back == ("pulls: request/reply messages that the servers answer (message; no RMA windows on this"
                         " MPI transport)")
    assert pull_line("rma", "rma", "message") == fell_back
    assert pull_line("message", "message", "message").endswith("(message; --pull message)")
    assert pull_line("auto", "message", "message").endswith(
        "(message; --pull auto: this MPI library makes no one-sided progress while a server computes)")
