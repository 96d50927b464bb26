from flowmap_lit.cli import main

if __name__ == "__main__":
    main()
