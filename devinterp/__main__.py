from devinterp.cli import main

raise SystemExit(main())
