"""Deployment: credentials for a SuperLink with TLS and SuperNode authentication."""
