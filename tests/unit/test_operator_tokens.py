"""Admin tokens derived from the operator key: stable for one object, different for any other (or a re-created
one of the same name), and the key Secret's location from the flag or the operator's own namespace."""
import pytest

from semipd.operator import main, tokens

pytestmark = pytest.mark.unit


def test_a_token_is_stable_for_one_object_and_differs_for_any_other():
    key = b"k" * 32
    one = tokens.derive_admin_token(key, "ns", "llama", "uid-1")
    assert one == tokens.derive_admin_token(key, "ns", "llama", "uid-1") and len(one) >= 43
    others = {tokens.derive_admin_token(key, "ns", "llama", "uid-2"),     # re-created under the same name
              tokens.derive_admin_token(key, "other", "llama", "uid-1"),
              tokens.derive_admin_token(b"j" * 32, "ns", "llama", "uid-1")}
    assert one not in others and len(others) == 3


def test_the_key_secret_comes_from_the_flag_or_the_operators_namespace(monkeypatch):
    assert main.token_key_secret("ops/my-key") == ("ops", "my-key")
    monkeypatch.setenv("POD_NAMESPACE", "semipd-system")
    assert main.token_key_secret(None) == ("semipd-system", tokens.DEFAULT_KEY_SECRET)
    for bad in ("no-slash", "/name", "ns/"):
        with pytest.raises(ValueError):
            main.token_key_secret(bad)
