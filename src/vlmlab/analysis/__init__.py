"""Studies of trained runs: ablation suites, the HTML report, contact sheets, Q-Former inspection."""
