from bootenv.cli import main

raise SystemExit(main())
