-- Version 2: other hosts' changes are read in pages in (seq, start) order. The blocks of one
-- lease share its change number, so paging by `seq` alone could stop inside one lease's blocks.
-- Never edit once landed: add a new numbered file instead.
CREATE INDEX block_seq_start ON block (seq, start);
DROP INDEX block_seq;
