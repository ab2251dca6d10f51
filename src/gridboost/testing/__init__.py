"""Tools that prove gridboost and its backends keep async resources honest. Needs pytest."""
