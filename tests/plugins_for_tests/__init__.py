"""Plugin modules the tests register the way users do: ``Grid(plugins=[module])``."""
