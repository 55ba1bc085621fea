"""An example wsgate authenticator plugin (see docs/plugins.md)."""

from wsgate_example_plugin.signed import SignedTokenAuthenticator, sign

__all__ = ["SignedTokenAuthenticator", "sign"]
