import pytest


@pytest.fixture(scope="session")
def judge():
    """The phantom class judge, fitted once per test session (~20 s)."""
    from dermt2im.mini.judge import fit_judge

    return fit_judge(300)
