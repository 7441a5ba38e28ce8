from synthflux.cli import main

raise SystemExit(main())
