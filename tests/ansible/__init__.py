"""Real ansible-playbook against private managers (and one host over real SSH);
the role's lint and the modules' own units."""
