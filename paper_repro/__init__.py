"""Paper reproduction: the Prompt Cache paper's reference numbers beside what this project measures."""
