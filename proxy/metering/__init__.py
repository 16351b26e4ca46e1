"""What a request costs and whether it may start: usage meters, prices, limits and budgets,
named limits, the ledger, reports, budget alerts, batch settlement."""
