import './base.css';
import './start-status.css';
import './pool.css';
