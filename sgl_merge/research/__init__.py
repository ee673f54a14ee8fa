"""Research agents: merged tool calls over real and local tools."""
