"""Who is calling and what they may touch: authentication, virtual keys and their secrets,
the allow-list policy over every resource-bearing field, job ownership."""
