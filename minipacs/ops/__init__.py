"""What operators use besides the server: checks, smoke-test clients, metrics, conformance."""
