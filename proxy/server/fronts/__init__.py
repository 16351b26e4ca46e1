"""The fronts: what each path prefix serves (Bedrock and its compatible APIs, AgentCore,
files, the admin API, the console), and how each relays its answers."""
