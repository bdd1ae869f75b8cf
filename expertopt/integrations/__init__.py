"""Engine integrations. Each module imports its engine; ``import expertopt`` imports none of them."""
