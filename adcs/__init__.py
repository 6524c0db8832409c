"""AD-style template enrollment front-end. Not built yet: see the AD-style issue."""
