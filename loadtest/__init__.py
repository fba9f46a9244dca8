"""Load tests and benchmarks of proxygate; not part of the installed package."""
