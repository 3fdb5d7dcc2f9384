"""Handler modules that `delayq listen --app` (or DELAYQ_APP) imports in the tests: a shop's
own actions, and modules that are wrong on purpose (a name used twice, a bad name)."""
